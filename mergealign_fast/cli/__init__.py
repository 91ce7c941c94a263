"""The command line: `entry` sets up the process before anything heavy loads, `main` parses the
arguments and runs a command (`mergealign-fast ...`, `python -m mergealign_fast ...`).  This
package imports nothing itself, so the entry point starts with nothing of ours loaded."""
