"""`seeddelta v1`: the user's v1 plan (down triage H1–H3b, then the mechanisms) as measured
experiments with a verdict each, by the plan's own exit rules.

* `profiles` — per model: the gate-only reference policy, the layers and budgets each experiment
  sweeps (the note's values for SmolLM2, their analogues for the tiny model);
* `policies` — the policy documents every measured setting is built from (so each setting is a
  file `seeddelta build --policy` reproduces);
* `experiments` — H1, H2, H3a, H3b, … as lists of measurements and the analysis of their results;
* `verdicts` — the exit rules;
* `replay` — mechanism 6 (replay pack, replay impact, replay-weighted retention, its exit rule);
* `run` — the cached, resumable run writing `v1.json` (read by the regress report's "v1 mechanisms"
  section) and `v1.md`.
"""

EXPERIMENTS = ("h1", "h2", "h3a", "h3b", "m2", "m4", "m5", "m7", "m1", "m3", "m6")
