"""Run machinery: what a run needs before and around training (flags, run directories, processes, memory)."""
