"""Tools on top of the library: the ``lightning-clip`` command, log reports, the threshold finder, demos.

Nothing in the library imports this package.
"""
