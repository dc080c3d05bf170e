"""The configuration: the YAML file read safely, validated into frozen records, and the TLS files it names.

The lowest layer with `errors`: it imports nothing else of the package.
"""
