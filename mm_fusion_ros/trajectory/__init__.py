"""The online trajectory (numpy only): predicted steps chained by their stamps, missing steps
bridged and counted, segments where time jumps back, ground truth by nearest stamp, first-order
SE(3) covariance. The pose source and the bridge are small interfaces (chain.PoseSource,
bridge.StepBridge), so an inertial filter can later take either role."""
