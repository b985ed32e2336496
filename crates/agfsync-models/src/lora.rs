//! Loading LoRA adapter files (diffusers/PEFT and kohya formats) onto our
//! models' LoRA slots.
