"""EDM's networks (Karras et al. 2022): layers, the DDPM++/NCSN++/ADM U-Nets and their preconditioning."""
