"""Video-level evaluation: action datasets (UCF101, HMDB51), clip features, retrieval, kNN, linear probe, zero-shot."""
