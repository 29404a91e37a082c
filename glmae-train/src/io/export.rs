//! A fine-tuned UNETR as a `.glmae` file: its weights under MONAI's names, its preprocessing and
//! class names, in float32 or int8.

use anyhow::{Result, bail};
use glmae_core::format::{ModelBuilder, Precision};

use crate::finetune::Finetuner;

impl Finetuner {
    /// The `.glmae` file of this model with its preprocessing and class names.
    pub fn export(&self, precision: Precision) -> Result<Vec<u8>> {
        let named = self.model.named_tensors(&self.cfg.unetr)?;
        let prep = self.cfg.preprocessing.to_model(self.cfg.class_names.clone());
        let builder = ModelBuilder::from_params(self.cfg.unetr, prep, precision, |spec| {
            named.iter().find(|t| t.name == spec.name.as_str()).map(|t| t.values.as_slice())
        })?;
        match builder.to_bytes() {
            Ok(b) => Ok(b),
            Err(e) => bail!("exported model is inconsistent: {e}"),
        }
    }
}
