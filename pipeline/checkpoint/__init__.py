"""The checkpoint folder: its format and read-only view (folder), writing and resume (manager), post-hoc EMA synthesis
(posthoc) and the choice of weights with the U-Net that holds them (weights)."""
