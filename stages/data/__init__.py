"""The data stage (`stage`), its TFRecord writer (`records`), the readers every later stage uses (`readers`,
`layout`) and the sources it reads (`sources`)."""
