//! Messages of the agent API (`/agent/v1`).
