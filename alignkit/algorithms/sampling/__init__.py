"""The sampling methods (best-of-N, rejection sampling, RAFT, RFT, ReST, ReST-EM) and the stages they share."""
