//! Training: AdamW (`optimizer`), learning-rate schedules (`schedule`) and the loop (`trainer`).

pub mod optimizer;
pub mod step;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;
