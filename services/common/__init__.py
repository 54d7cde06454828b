"""What every service shares: config models, the Redis stream client, message
schemas, metrics and logging helpers. Components import from here, never from
each other."""
