"""interplab.circuits"""
