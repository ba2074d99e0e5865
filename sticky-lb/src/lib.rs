//! sticky-lb's controller: configuration, Maglev tables, the kernel data path as the controller
//! sees it, the expiry sweep and the read-side views the CLI prints.

pub mod batch;
pub mod config;
pub mod conntrack;
pub mod control;
pub mod controller;
pub mod dataplane;
pub mod decap;
pub mod expiry;
pub mod health;
pub mod http;
pub mod maglev;
pub mod metrics;
pub mod neighbour;
pub mod netns;
pub mod offload;
pub mod prog_run;
pub mod service_index;
pub mod shared;
pub mod state;
pub mod view;
pub mod vip_address;
