//! Parsers of numeric flags that refuse, before any work, the values TRL or PyTorch would refuse or that would
//! silently train nothing. clap names the flag in the error; `--config` names the YAML key and the file.

fn number(text: &str) -> Result<f64, String> {
    let value: f64 = text.trim().parse().map_err(|_| format!("'{text}' is not a number"))?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(format!("{value} is not a finite number"))
    }
}

/// A boolean as transformers' `string_to_bool` reads it (true/false, yes/no, y/n, t/f, 1/0), for the
/// optional booleans (`--completion-only-loss false`).
pub fn boolean(text: &str) -> Result<bool, String> {
    match text.trim().to_lowercase().as_str() {
        "true" | "yes" | "y" | "t" | "1" => Ok(true),
        "false" | "no" | "n" | "f" | "0" => Ok(false),
        _ => Err(format!("'{text}' is not a boolean (true or false)")),
    }
}

/// Any finite number.
pub fn finite(text: &str) -> Result<f64, String> {
    number(text)
}

/// A finite number ≥ 0 (a learning rate, weight decay, epsilon, a loss weight; `--max-grad-norm`, where 0 turns
/// clipping off).
pub fn non_negative(text: &str) -> Result<f64, String> {
    let value = number(text)?;
    if value >= 0.0 {
        Ok(value)
    } else {
        Err(format!("{value} is negative; it must be at least 0"))
    }
}

/// A finite number > 0 (β, DiscoPOP's τ).
pub fn positive(text: &str) -> Result<f64, String> {
    let value = number(text)?;
    if value > 0.0 {
        Ok(value)
    } else {
        Err(format!("{value} must be greater than 0"))
    }
}

/// `logging_steps`, `eval_steps`, `save_steps`, `warmup_steps`: a whole number of steps, or below 1 a fraction of
/// the total steps, as transformers reads them.
pub fn steps(text: &str) -> Result<f64, String> {
    let value = non_negative(text)?;
    if value > 1.0 && value.fract() != 0.0 {
        return Err(format!(
            "{value} steps: a number of steps above 1 must be whole (below 1 it is a fraction of the total)"
        ));
    }
    Ok(value)
}

/// `logging_steps`: as [`steps`], and more than 0 (transformers refuses 0 there).
pub fn positive_steps(text: &str) -> Result<f64, String> {
    let value = steps(text)?;
    if value > 0.0 {
        Ok(value)
    } else {
        Err(format!("{value} must be greater than 0"))
    }
}

/// A fraction in [0, 1] (warmup ratio, the final rate of `cosine_with_min_lr`).
pub fn fraction(text: &str) -> Result<f64, String> {
    let value = number(text)?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} must be in [0, 1]"))
    }
}

/// An Adam β in [0, 1), as torch.optim.AdamW requires.
pub fn adam_beta(text: &str) -> Result<f64, String> {
    let value = number(text)?;
    if (0.0..1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} must be in [0, 1)"))
    }
}

/// Label smoothing in [0, 0.5): the probability that a pair's preference is flipped (at 0.5 the robust loss
/// divides by zero and the smoothed sigmoid loss no longer depends on the policy).
pub fn label_smoothing(text: &str) -> Result<f64, String> {
    let value = number(text)?;
    if (0.0..0.5).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} must be in [0, 0.5)"))
    }
}

/// A count of at least 1 (batch sizes, accumulation steps, logging interval).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    let value: usize = text.trim().parse().map_err(|_| format!("'{text}' is not a whole number"))?;
    if value >= 1 {
        Ok(value)
    } else {
        Err("it must be at least 1".to_string())
    }
}

/// A sequence length with room for one prompt token and one completion token.
pub fn max_length(text: &str) -> Result<usize, String> {
    let value: usize = text.trim().parse().map_err(|_| format!("'{text}' is not a whole number"))?;
    if value >= 2 {
        Ok(value)
    } else {
        Err(format!("{value} leaves no room for a prompt token and a completion token; it must be at least 2"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuse_what_trl_or_torch_would_refuse() {
        assert!(non_negative("NaN").unwrap_err().contains("not a finite number"));
        assert!(non_negative("inf").is_err() && non_negative("-1e-3").is_err());
        assert_eq!(non_negative("0").unwrap(), 0.0);
        assert!(adam_beta("1.5").is_err() && adam_beta("1").is_err() && adam_beta("-0.1").is_err());
        assert_eq!(adam_beta("0.999").unwrap(), 0.999);
        assert!(fraction("2").is_err());
        assert_eq!(fraction("1").unwrap(), 1.0);
        assert!(positive("0").is_err() && positive("NaN").is_err());
        assert!(label_smoothing("0.5").is_err());
        assert!(at_least_one("0").is_err() && at_least_one("-1").is_err() && at_least_one("1.5").is_err());
        assert!(max_length("1").is_err());
        assert_eq!(max_length("2").unwrap(), 2);
    }
}
