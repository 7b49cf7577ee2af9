"""Reversibility exports (issue 4): a whole contract streamed to a new provider in open
formats (BagIt, POSIX pax tar, ZIP64, plain tree), verified there, with a signed report.

Usage and format choices: docs/EXPORT.md. Entry points: export.export_contract,
export.verify_export, journal.purge_temporary (the nightly purge job calls it).
Nothing is imported here: `kiwi-restore` loads this package for its commands' help only.
"""
