//! Training, following one step: `run` (the loop: data order, schedule, logging, evaluation, checkpoints) calls
//! `trainer::Trainer::optimizer_step` (micro-batches, reference log-probs, clipping, AdamW), which calls
//! `step::forward_backward` on each batch. Beside them: the optimizer (`optimizer`), learning-rate schedules
//! (`schedule`), reference log-probs computed once (`reference`), evaluation (`evaluate`), checkpoints
//! (`checkpoint`), and what a run writes (`history`, `tensorboard`).

pub mod checkpoint;
pub mod distributed;
pub mod evaluate;
pub mod history;
pub mod optimizer;
pub mod reference;
pub mod run;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod trainer;

pub use run::{train, TrainInputs};
pub use trainer::{Interval, Reference, Trainer, TrainerConfig};
