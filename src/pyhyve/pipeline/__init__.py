"""The one path between a VM and its saved form, shared by snapshot files and migration
streams: the machine record (what the VM is), state sections (what it was doing), the
guest pages (what it held), and the build-and-apply path that turns them back into a VM.
snapshot/ and migration/ only add their containers (files, frames) around these.
"""
