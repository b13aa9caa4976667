"""Process plumbing: forking channel processes and logging across them."""
