"""Runtime mechanism: the scheduler, the worker pool and its GPU workers, shared weights, journal, heaps, drain."""
