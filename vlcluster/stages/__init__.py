"""The stage layer: one module per stage kind, the table of kinds, and the
run-directory contract every stage process and backend shares.

Library packages (data, model, train, merge, tasks, storage, metrics) never
import from here; a stage runner reads its spec and context, calls the
libraries with plain arguments and writes its outputs.
"""
