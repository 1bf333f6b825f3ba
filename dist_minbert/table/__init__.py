"""`dist-minbert table`: the study's rows as one resumable experiment — its config, its results file and RESULTS.md."""
