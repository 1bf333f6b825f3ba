"""`dist-minbert analyse`: the study's analysis of a trained run (confusion matrix, worst examples, gradient conflicts)."""
