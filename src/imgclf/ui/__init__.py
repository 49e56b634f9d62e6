"""Review web app: data set browser, relabelling with undo, run results, label errors, active learning."""
