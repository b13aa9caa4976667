"""The ``file:`` transport's image: a self-describing file with a fixed offset for every page (like QEMU's mapped-ram)."""
