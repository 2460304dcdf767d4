"""Volume backups into a backup store."""
