"""xDS: translation builds snapshots, the cache holds them, the server streams them."""
