module nubes.local/pause

go 1.25
