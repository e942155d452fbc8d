"""ftctl."""
