//! AI feedback for agfsync: the scorers that rank candidate images (CLIP
//! score, aesthetic score, VQA score; HPSv2 for evaluation), their
//! combination, and preference-pair selection.
