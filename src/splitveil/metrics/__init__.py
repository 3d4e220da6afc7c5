"""Pure metric functions: nothing here holds state or touches a model."""
