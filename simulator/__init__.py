"""fleetsim coordinator: config, run loop, Flower grid, clock, metrics, results, CLI."""
