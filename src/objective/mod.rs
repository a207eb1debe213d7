//! Objectives over per-token scores: DPO (`dpo`), ORPO (`orpo`), their shared log-prob machinery (`logps`),
//! TRL's metric averaging (`metrics`) and scoring a model on a dataset (`evaluate`).

pub mod dpo;
pub mod evaluate;
pub mod logps;
pub mod metrics;
pub mod orpo;
