"""Pipeline stages: one thin module per `mmrecall <command>` (and DVC stage), each with its `main()`:
parse arguments, load params, call the library, write outputs, log. No library module imports these.
"""
