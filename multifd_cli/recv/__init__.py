"""The receive side: the receiver and its epoch barrier, the channels that check and write pages, the sink, and restore from an image."""
