"""tfbitmeta."""
