"""Commands above the process packages: they start, drive, attack or report on processes
(tandem-run, -pipeline, -experiment, -report, -status, -keys, -fuzz and the synthetic actor) and
may import from actors/, learner/ and realrobot/; those import only common/, never tools/."""
