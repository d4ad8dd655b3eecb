"""reid-train: the fast-reid "bag of tricks" training recipe (see issue 3)."""
