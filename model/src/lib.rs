//! Types that the coordinator and the agent both speak: the agent API's
//! messages and a host's inventory.

pub mod agent_api;
pub mod inventory;
