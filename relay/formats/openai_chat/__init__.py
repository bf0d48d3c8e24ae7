"""OpenAI Chat Completions: request out, response and stream back."""
