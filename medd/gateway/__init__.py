"""The gateway node: takes images from an imaging centre's modalities (C-STORE, a watched
folder), forwards them to central store-and-forward, and pulls central's receipts and results."""
