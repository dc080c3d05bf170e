"""`supervisorctl`: the client side of the control protocol and the table `status` prints."""
