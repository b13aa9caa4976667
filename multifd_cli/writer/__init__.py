"""What is done to the writer: pausing it for the switchover, throttling it, and the watchdog that never leaves it paused."""
