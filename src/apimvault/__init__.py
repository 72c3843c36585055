"""apimvault."""
