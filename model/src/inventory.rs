//! A host inventory as the agent discovers it.
