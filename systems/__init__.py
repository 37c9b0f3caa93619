"""The systems T2I-SPO is measured against, and its studies: AlignGuard (alignguard), Table 2's
other methods (baselines, rece), Fig. 4B's attacks (attacks, sneakyprompt), PSA (psa, psa_eval,
psa_diagnose) and the DFM study (dfm_study). Each runs from the repository root as
`python -m systems.NAME COMMAND`, trains through stage 4's loop and reports through a section
that stage 5 finds in lib/registry.py.

What it is not: T2I-SPO itself (the numbered stages and common.py), which imports nothing here.
"""
