//! py-consul and node-consul against agents.
