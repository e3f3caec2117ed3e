"""Reading and writing other people's files (pickles, torch.save files, safetensors). No networks here."""
