"""Volume backends: the contract (base), the file and LVM backends."""
