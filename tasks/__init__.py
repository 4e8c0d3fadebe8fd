"""Pure pipeline steps and the Prefect tasks around them."""
