"""Runtime pieces every service shares: settings, bus topology, dead letters, processes."""
