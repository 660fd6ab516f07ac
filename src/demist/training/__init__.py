"""Training: one loop (`loop.train`) for every stage; stages are small definitions of modules, phases and losses."""
